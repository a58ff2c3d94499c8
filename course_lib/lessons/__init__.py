"""What only the notebooks use: plots, the model tour, design experiments, speed measurements."""
