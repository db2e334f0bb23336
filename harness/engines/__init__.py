"""Engines: the system under test and the references (adapters arrive with issue #4)."""
