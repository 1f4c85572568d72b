"""Screens and modal forms of the rbee dashboard."""
