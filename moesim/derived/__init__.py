"""Figures derived from a model's shape and layout: parameters, FLOPs, bytes, memory per device.
Uses config, layout, routing, units."""
