"""Imports every built-in adapter module so that it registers itself."""
