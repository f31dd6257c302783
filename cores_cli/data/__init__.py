"""Datasets: readers parse files into plain records; one transform turns records into tensors."""
