"""OpenAI's API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) over the service's job queue."""
