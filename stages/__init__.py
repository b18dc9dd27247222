"""Pipeline stages: thin glue between the runtime and phasestream.models."""
