"""The simulation: the stream's virtual devices, the in-process and Flower transports that
carry their rounds, the simulation's ServerApp/ClientApp, the report, canary audits, and the
experiment settings (TOML). Imports server, client and common; only the command line (and
benchmarks) import it."""
