"""Widgets of the rbee dashboard."""
