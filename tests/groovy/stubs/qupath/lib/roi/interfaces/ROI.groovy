package qupath.lib.roi.interfaces

/** STAND-IN for QuPath's ROI interface (not QuPath): only what the scripts and stand-ins use. */
interface ROI {
    /** "Rectangle", "Polygon", ... as in QuPath. */
    String getRoiName()
    double getBoundsX()
    double getBoundsY()
    double getBoundsWidth()
    double getBoundsHeight()
    /** The centroid, level-0 pixels (the stand-ins: of the vertices). */
    double getCentroidX()
    double getCentroidY()
    /** Whether the point lies inside the ROI. */
    boolean contains(double x, double y)
    /** Stand-in only: the exterior ring as [[x, y], ...], closed. */
    List<List<Double>> ring()
}
