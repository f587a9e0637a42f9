"""The folder that `ep.install_as_deep_ep(children=True)` puts on PYTHONPATH: its sitecustomize.py gives the
processes started from then on the `deep_ep` alias too (see ep._compat)."""
