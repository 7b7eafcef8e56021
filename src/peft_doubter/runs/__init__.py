"""A run directory ties the stages together: `collect` -> `train` -> `eval` (-> `export`, `push`), each reading
`run.json`, and `ask` on the trained result."""
