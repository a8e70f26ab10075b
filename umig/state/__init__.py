"""One module per kind of process state, each holding its dump side and its restore side:
memory, files, signals, credentials, registers, rseq and the task's own attributes."""
