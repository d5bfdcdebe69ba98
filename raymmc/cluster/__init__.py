"""Clustering math: losses, targets, assignments, k-means and the algorithms. No Ray here."""
