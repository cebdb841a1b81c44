"""The server: the federated run (sampling, validation, aggregation, user-level accounting,
checkpoints, its one round loop), the deployment's ServerApp and SuperLink. Imports only
fedrec.common: never the device side, never the simulation."""
