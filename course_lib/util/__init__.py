"""Small helpers every room uses: atomic files, quiet transformers, text and Markdown tables."""
