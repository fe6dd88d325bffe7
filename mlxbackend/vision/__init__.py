"""Vision, video and audio input for the text engine, through mlx-vlm."""
