"""The ``simsearch-wsi`` command line (entry point :func:`simsearch_wsi.cli.main.main`).

:mod:`.main` builds the top-level parser and holds the one error handler; each command sits with
its options in its own module (:mod:`.info`, :mod:`.suggest`, :mod:`.review`, :mod:`.train`,
:mod:`.pretrain`, :mod:`.predict`, :mod:`.cohort`, :mod:`.serve`, :mod:`.evaluate`,
:mod:`.demo`); :mod:`.options` declares the options several commands share, :mod:`.argtypes`
their value types, :mod:`.engine` builds the search engine from them, :mod:`.inputs` keeps
inputs safe, :mod:`.console` prints, :mod:`.exitcodes` names the exit codes.
"""
