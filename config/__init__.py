"""Kisse configuration: environment variables parsed into typed settings."""
