"""Questions and answers: packaged benchmarks and user files, prompt formats, correctness judges, question-level
splits, tokenized prompt + continuation sequences, and the oracle collection into the activation cache."""
