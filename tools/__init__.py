"""The ``qir`` command line (installed as ``qir.tools``): a thin layer over the library calls."""
