"""Seeded mutation fuzzing of the importers: hostile and broken files must end in an InferccError."""
