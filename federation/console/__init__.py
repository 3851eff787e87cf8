"""The operator's console: a login of its own and server-rendered pages under ``/console/``."""
