"""The facegrid client: the command line's calls to the gateway and ingest, and seeding.

Installed with the ``client`` extra (it draws its tables with rich); no service imports it.
"""
