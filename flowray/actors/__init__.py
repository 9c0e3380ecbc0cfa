"""Ray actors: thin shells that do I/O around flowray's pure cores."""
