"""The ``hf-asynclm`` command line (installed as the package ``hf_asynclm_cli``)."""
