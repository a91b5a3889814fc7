package qupath.lib.objects

import qupath.lib.measurements.MeasurementList
import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI

/**
 * STAND-IN for QuPath's PathObject (not QuPath): the getters and setters of QuPath 0.4+ that
 * the simsearch scripts call (getID, getPathClass/setPathClass, getROI, getMeasurementList,
 * isAnnotation/isDetection, getName/setName).
 */
abstract class PathObject {
    private UUID id = UUID.randomUUID()
    private PathClass pathClass
    private final ROI roi
    private final MeasurementList measurementList = new MeasurementList()
    private String name

    protected PathObject(ROI roi, PathClass pathClass) {
        this.roi = roi
        this.pathClass = pathClass
    }

    UUID getID() { return id }

    /** QuPath 0.4+: objects read from GeoJSON keep their "id". */
    void setID(UUID id) { this.id = id }

    PathClass getPathClass() { return pathClass }

    void setPathClass(PathClass pathClass) { this.pathClass = pathClass }

    ROI getROI() { return roi }

    MeasurementList getMeasurementList() { return measurementList }

    String getName() { return name }

    void setName(String name) { this.name = name }

    boolean isAnnotation() { return false }

    boolean isDetection() { return false }

    @Override
    String toString() {
        return getClass().getSimpleName() + '(' + (pathClass ?: 'Unclassified') + ', ' + id + ')'
    }
}
