"""The exit codes of every mode (README.md, "Command line"): one contract for the
restart policies of Docker, Kubernetes and the drills.

An exception that ends a mode with a code of its own says so in two class attributes,
``exit_code`` and ``summary`` (the log's event), so that the command line maps failures to
codes without knowing (or importing) the modules that raise them."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad usage or config, a refused resume, a store that refuses us for good
EXIT_BAD_DATA = 3
EXIT_TRY_LATER = 75  # stalled, or another writer holds the run: a restart later resumes it
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
