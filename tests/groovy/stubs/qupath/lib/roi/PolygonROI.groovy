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

    private List<List<Double>> open() {
        return points.size() > 1 && points[0] == points[-1] ? points[0..-2] : points
    }

    double getCentroidX() { return open().collect { it[0] }.sum() / open().size() }
    double getCentroidY() { return open().collect { it[1] }.sum() / open().size() }

    /** Even-odd ray casting. */
    boolean contains(double x, double y) {
        List<List<Double>> pts = open()
        boolean inside = false
        int n = pts.size()
        for (int i = 0; i < n; i++) {
            int j = (i + n - 1) % n
            double xi = pts[i][0]
            double yi = pts[i][1]
            double xj = pts[j][0]
            double yj = pts[j][1]
            if ((yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi)
                inside = !inside
        }
        return inside
    }
}
