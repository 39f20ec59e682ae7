"""Text handling: the tokenizer and streaming detokenizer, chat templates and their work budget."""
