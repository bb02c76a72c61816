"""Anthropic's Messages API (`/v1/messages`) over the service's job queue."""
