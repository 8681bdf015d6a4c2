"""The rest of the OpenDelta and OpenPrompt API a course script calls, on optqa's library and checkpoint format."""
