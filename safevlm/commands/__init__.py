"""One module per `safevlm` subcommand; each defines `register(subparsers)`."""
