"""The base layer: paths and atomic I/O (local or gs:// through etils.epath), workdir locks and
leases, exit statuses, the typed config schema (`schema`'s building blocks, `settings`' sections)
and the config files built on it (`config_lib`), experiment tracking (`tracking`, W&B), the
accelerator table and small figure helpers. It imports no other stage.
"""
