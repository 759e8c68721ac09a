"""What every entry point shares at run time: the process group (`runtime.distributed`) and the
one-run-per-folder lock (`runtime.runlock`). Below training and evaluation, above the model layer."""
