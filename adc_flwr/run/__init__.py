"""A run's record and life: the run directory and its atomic files, the summary, whether a
directory resumes, and every check a config passes before anything expensive starts."""
