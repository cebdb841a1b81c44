"""The device: its store, privacy ledger and round, the deployment's ClientApp and SuperNode.
Imports only fedrec.common: never the server, never the simulation."""
