package qupath.lib.objects

import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI

/** STAND-IN for QuPath's PathDetectionObject (not QuPath). */
class PathDetectionObject extends PathObject {
    PathDetectionObject(ROI roi, PathClass pathClass) { super(roi, pathClass) }

    @Override
    boolean isDetection() { return true }
}
