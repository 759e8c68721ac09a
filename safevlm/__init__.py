"""The `safevlm` command line and the end-to-end pipeline (thin layers over the packages)."""
