"""QuPath's side of the exchange: its GeoJSON dialect, projects through paquo, and label masks
turned into QuPath polygons."""
