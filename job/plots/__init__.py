"""Pictures: charts drawn in a worker process, and the PNG, GIF and .npy files of videos."""
