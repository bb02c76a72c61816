"""The HTTP front end: validates requests, enqueues jobs by task name, waits on their Redis streams."""
