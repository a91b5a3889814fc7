package qupath.lib.roi

import qupath.lib.roi.interfaces.ROI

/** STAND-IN for QuPath's RectangleROI (not QuPath): an axis-aligned box in level-0 pixels. */
class RectangleROI implements ROI {
    final double x, y, width, height

    RectangleROI(double x, double y, double width, double height) {
        this.x = x; this.y = y; this.width = width; this.height = height
    }

    String getRoiName() { return 'Rectangle' }
    double getBoundsX() { return x }
    double getBoundsY() { return y }
    double getBoundsWidth() { return width }
    double getBoundsHeight() { return height }
    double getCentroidX() { return x + width / 2 }
    double getCentroidY() { return y + height / 2 }
    boolean contains(double px, double py) { return px >= x && px < x + width && py >= y && py < y + height }

    List<List<Double>> ring() {
        return [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]
                .collect { List p -> [p[0] as Double, p[1] as Double] }
    }
}
