"""The training harness and CLI: a layer on top of :mod:`rankwise` (which never imports it)."""
