"""Topologies, Prometheus and alert rules, dashboards and service files, shipped as package data."""
