"""The cluster as a networkx graph, and device-to-device paths as edge ids.
Uses config (and the catalog while link specs are looked up there)."""
