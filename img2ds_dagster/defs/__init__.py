"""Dagster adapters over the engine: partitions, resources, assets, sensors."""
