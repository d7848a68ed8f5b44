"""What both launchers need (flower-server's coordinator and flower-client's site): process
supervision, the Flower environment, the audit log, Flower timing patches and the constants the
client and server apps exchange on the wire. Imports flwr and common/ only, never client/,
server/ or sim/ (tests/test_import_rules.py)."""
