package qupath.lib.roi.interfaces

/** STAND-IN for QuPath's ROI interface (not QuPath): only what the scripts and stand-ins use. */
interface ROI {
    /** "Rectangle", "Polygon", ... as in QuPath. */
    String getRoiName()
    double getBoundsX()
    double getBoundsY()
    double getBoundsWidth()
    double getBoundsHeight()
    /** Stand-in only: the exterior ring as [[x, y], ...], closed. */
    List<List<Double>> ring()
}
