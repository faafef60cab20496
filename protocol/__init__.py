"""The protocol's sources and generators: SPEC.md, errors.toml, the vectors and the scripts that
make them. A package only so that tests can import `protocol.spectables`."""
