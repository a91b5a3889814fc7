"""Exit codes of the ``simsearch-wsi`` command line."""

EXIT_OK = 0
EXIT_ERROR = 1  # an error the user can fix, reported in one line
EXIT_USAGE = 2  # no command given (argparse also exits with 2 on a bad option)
EXIT_INTERRUPTED = 130  # Ctrl-C
