package qupath.lib.roi

import qupath.lib.roi.interfaces.ROI

/** STAND-IN for QuPath's PolygonROI (not QuPath): a closed exterior ring. */
class PolygonROI implements ROI {
    final List<List<Double>> points

    PolygonROI(List<List<Double>> points) {
        this.points = points.collect { List p -> [p[0] as Double, p[1] as Double] }
    }

    String getRoiName() { return 'Polygon' }
    double getBoundsX() { return points.collect { it[0] }.min() }
    double getBoundsY() { return points.collect { it[1] }.min() }
    double getBoundsWidth() { return points.collect { it[0] }.max() - getBoundsX() }
    double getBoundsHeight() { return points.collect { it[1] }.max() - getBoundsY() }
    List<List<Double>> ring() { return points }
}
