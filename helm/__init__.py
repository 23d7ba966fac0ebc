"""The helm chart, shipped inside the wheel as package data."""
