"""Using a trained model: loading, generation, the chat session, the widget."""
