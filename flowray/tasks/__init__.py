"""Ray tasks for batch processing: map, reduce, and writing the warehouse."""
