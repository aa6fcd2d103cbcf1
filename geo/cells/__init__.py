"""Cell priors: adaptive S2 partitions of the gallery, classification heads over them, hierarchical prediction.

Build side: :func:`geo.cells.stage.build_cells_stage` with a :class:`geo.cells.stage.CellsConfig`.
Query side: :class:`geo.cells.predict.CellPredictor`.
"""
